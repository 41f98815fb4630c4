"""Camera backends, the frame ring buffer, frame choice, quality checks and encoding."""
