# The root module owns the provider configurations; child modules receive them. Credentials
# are never configured here: Karrots passes temporary credentials to terraform as environment
# variables (SPEC §3.9), and the aliases chain from them through STS.
provider "aws" {
  region = var.region

  default_tags {
    tags = local.tags
  }
}

# The main account's primary zone, through karrots-root-dns (NS records only).
provider "aws" {
  alias  = "root_dns"
  region = var.region

  dynamic "assume_role" {
    for_each = var.dns == null ? [] : [var.dns.account_id]
    content {
      role_arn     = "arn:aws:iam::${assume_role.value}:role/karrots-root-dns"
      session_name = "${var.cluster_name}-dns"
    }
  }
}

# The data-warehouse account, through karrots-peering.
provider "aws" {
  alias  = "data"
  region = var.region

  dynamic "assume_role" {
    for_each = var.data_peering == null ? [] : [var.data_peering.account_id]
    content {
      role_arn     = "arn:aws:iam::${assume_role.value}:role/karrots-peering"
      session_name = "${var.cluster_name}-peering"
    }
  }
}
