"""The conversion: architectures, the plan, the direction, the projection kernel, and where the bytes go."""
