"""One module per lifecycle stage; each exposes its definitions through `@dg.definitions`."""
