"""Local submission: the sendmail socket and what serves it."""
