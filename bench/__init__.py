"""`python -m bench`: microbenchmarks of lora-kernels against the peers, side by side in one run."""
