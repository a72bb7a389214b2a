"""The ClientApp: one silo (fedshop.deploy.silo_app, fedshop.deploy.silo_secagg), or in a vertical
run one feature holder (fedshop.deploy.vertical_party).

Flower starts a process per message: each handler imports only what it needs, so that the secure
aggregation steps do not pay for importing PyTorch.
"""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

app = ClientApp()


@app.query()
def hello(message: Message, context: Context) -> Message:
    from fedshop.deploy.silo_app import handle

    return handle(message, context, "hello")


@app.train()
def train(message: Message, context: Context) -> Message:
    from fedshop.deploy.silo_app import handle

    return handle(message, context, "train")


@app.train("secagg")
def secagg(message: Message, context: Context) -> Message:
    from fedshop.deploy.silo_secagg import handle_step

    return handle_step(message, context)


@app.query("vertical")
def vertical_query(message: Message, context: Context) -> Message:
    from fedshop.deploy.vertical_party import handle

    return handle(message, context)


@app.train("vertical")
def vertical_train(message: Message, context: Context) -> Message:
    from fedshop.deploy.vertical_party import handle

    return handle(message, context)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    from fedshop.deploy.silo_app import handle

    return handle(message, context, "evaluate")
