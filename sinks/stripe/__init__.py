"""Sending meter events to Stripe: the v1 sink (one call per event), the v2 meter-event stream sink, and the
classification of Stripe's errors into a sink status."""
