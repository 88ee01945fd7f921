"""Searches for inputs that show a neuron in a sign: sampling, corner and gradient ascent, multi-start
PGD, region LPs, pattern search, the attack and its background process. They find witnesses, each
confirmed by a float64 forward pass; nothing here proves anything."""
