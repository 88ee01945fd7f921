"""The vocabulary every step shares, numpy only: the network IR and its structured operators, the
input box, verdicts and the tier table, directions, tolerances and errors. Imports nothing else
from the package, so worker processes and tests can load it alone."""
