"""advlab.defenses"""
