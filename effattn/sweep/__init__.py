"""The benchmark engine: sweep specs, workers, meters, the results store, reports, plots."""
