"""The math of NHA: the reference recurrence, the portable chunked path, and
(per backend) fused kernels. Everything here takes validated inputs."""
