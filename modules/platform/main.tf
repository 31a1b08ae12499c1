locals {
  tags = merge(var.tags, {
    "karrots:cluster" = var.cluster_name
    "managed-by"      = "karrots"
  })
}

module "network" {
  source = "../network"

  name               = var.cluster_name
  cidr_block         = var.vpc_cidr
  availability_zones = var.availability_zones
  tags               = local.tags
}
