"""The ServerApp: FedShop's federated server (fedshop.deploy.server_app.serve)."""

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedshop.deploy.server_app import serve

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    serve(grid, context)
