"""The Click shell. Each command lives in its own module and is imported only when it runs."""
