"""The ServerApp: FedShop's federated server (fedshop.deploy.server_app.serve), or in a vertical run
the label holder (fedshop.deploy.vertical_server.serve_vertical)."""

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedshop.deploy.flower_waits import shorten_object_pulls
from fedshop.deploy.server_app import serve

shorten_object_pulls()  # the silos' replies, pulled without 1 s back-offs
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    if str(context.run_config.get("task", "recommend")) == "vertical":
        from fedshop.deploy.vertical_server import serve_vertical

        serve_vertical(grid, context)
    else:
        serve(grid, context)
