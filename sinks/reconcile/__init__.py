"""The reconciliation with Stripe: the ledger's side and its stored runs, Stripe's side (paced, read-only), the
repairs, and one run that compares, checks invoices and repairs."""
