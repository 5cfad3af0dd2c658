"""Platform adapters: translate chat platforms to and from core types."""
