"""Vertical federation: parties that hold different columns about the same shoppers.

The label holder (a platform with the rentals and their fit labels) and any number of feature holders
(partners with other facts about some of the same shoppers) align their customers by private set
intersection (`fedshop.secure.psi`) and train one model whose inputs never leave their owner: split
learning (each feature holder's bottom model sends cut-layer activations, the label holder's top model
sends back their gradients), or logistic regression with Paillier-encrypted gradients.
"""
