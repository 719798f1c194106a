"""Stripe's webhook events on the ledger side: the store that applies each event once, its read-only views,
and the provisioning at Stripe that an event sets off (subscription and sign-up credit)."""
