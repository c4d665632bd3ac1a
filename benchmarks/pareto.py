"""Accuracy vs KV budget for every policy on the bundled tasks: see kvpilot/bench/pareto.py (`kvpilot bench pareto`)."""
from kvpilot.bench.pareto import main

if __name__ == "__main__":
    main()
