"""``tunesmith compare``: adaptation methods side by side on the user's own data."""
