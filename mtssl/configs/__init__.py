"""Configuration trees of every binary, and the flags generated from them."""
