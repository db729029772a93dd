"""advlab.eval"""
