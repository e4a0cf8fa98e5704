"""Side-by-side benchmarks of this package's AWD-LSTM and fastai 2.8's: `python -m benchmarks.run`."""
