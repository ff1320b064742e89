"""igs2gs: Instruct-GS2GS for Nerfstudio. The registered method lives in igs2gs.config."""
