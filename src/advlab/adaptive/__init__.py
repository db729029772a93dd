"""advlab.adaptive"""
