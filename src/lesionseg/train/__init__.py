"""Training, evaluation, export, adaptation and quality fitting: everything that needs PyTorch."""
