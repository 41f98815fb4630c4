"""What the device and the clinic's gateway share on the wire: the transfer protocol, the
capture bundle, sealing (HPKE), signed messages, durable writes, JSON log events and thread
supervision. It imports neither ``device_agent`` nor ``clinic_gateway``: both import it."""
