"""Offline half of InfantinO: labelled images -> trained backbone + MLP head -> evaluation."""
