"""Real deployment on Flower's deployment engine: one process per party, TLS, node authentication."""

# The protections a deployment runs: no party holds a decryption key there, so not ckks or paillier.
# `fedshop deploy local --help` lists these and `deploy.run.check_deployable` refuses the others.
DEPLOY_PROTECTIONS = ("none", "secagg")
