"""
Who is calling, and what they may do: kernel-verified identities per
transport (L{identity}, L{sockdiag}), and the ownership and policy rules
built on them.
"""
