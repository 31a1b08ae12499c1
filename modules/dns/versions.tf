terraform {
  required_version = ">= 1.5"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.0, < 6.0"
      # aws.root_dns: the account holding the primary zone, reached through karrots-root-dns.
      configuration_aliases = [aws.root_dns]
    }
  }
}
