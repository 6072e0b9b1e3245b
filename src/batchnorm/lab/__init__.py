"""The BN lab: experiments on real data that show what batch normalization does."""
