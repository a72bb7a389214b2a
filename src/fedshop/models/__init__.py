"""Models. Each declares which parameters are shared (travel to the server) and which stay private."""
