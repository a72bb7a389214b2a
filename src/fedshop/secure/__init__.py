"""Protection of updates in transit: the server learns only the sum (SecAgg, CKKS, Paillier)."""
