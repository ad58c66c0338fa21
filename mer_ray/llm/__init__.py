"""mer_ray.llm"""
