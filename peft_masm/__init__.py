"""MASM for PEFT."""
