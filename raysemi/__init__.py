"""raysemi: semi-supervised semantic segmentation at scale."""
