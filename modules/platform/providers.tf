# The root module owns the provider configuration; child modules receive it. Credentials are
# never configured here: Karrots passes temporary credentials to terraform as environment
# variables (SPEC §3.9).
provider "aws" {
  region = var.region

  default_tags {
    tags = local.tags
  }
}
