"""The student: how it trains fast (``fast``) and how fast it runs once deployed (``speed``)."""
