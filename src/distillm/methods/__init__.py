"""Distillation methods: each module says which data a method consumes and which loss it applies."""
