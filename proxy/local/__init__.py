"""What only the embedded default uses: the local tritonserver launcher and the tiny checkpoint builder."""
