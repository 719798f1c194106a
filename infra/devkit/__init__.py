"""The developer kit: embedded broker, local Stripe, simulator, demo, benchmarks, test stack.

Nothing in production code imports this package; the console script enters through
:mod:`infra.devkit.cli`, which adds the dev commands to the production command group.
"""
