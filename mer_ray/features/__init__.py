"""Media decoding and frozen encoders as plain classes (the extraction stages), and the Ray Data extraction job."""
