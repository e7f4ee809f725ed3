"""Shared foundations every layer may use: config schema, feature spec, keys, errors, stages, Ray set-up."""
