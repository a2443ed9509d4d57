"""Readers that turn raw interactions into an (interactions, Schema) pair."""
