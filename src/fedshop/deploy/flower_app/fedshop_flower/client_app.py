"""The ClientApp: one silo (fedshop.deploy.silo_app)."""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedshop.deploy.silo_app import handle

app = ClientApp()


@app.query()
def hello(message: Message, context: Context) -> Message:
    return handle(message, context, "hello")


@app.train()
def train(message: Message, context: Context) -> Message:
    return handle(message, context, "train")


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    return handle(message, context, "evaluate")
