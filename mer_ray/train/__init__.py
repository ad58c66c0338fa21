"""mer_ray.train"""
