"""Causal-LM task models built on NHALayer (needs keras-hub: pip install keras-nha[hub])."""
