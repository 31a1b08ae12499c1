locals {
  tags = merge(var.tags, {
    "karrots:cluster" = var.cluster_name
    "managed-by"      = "karrots"
  })
  account_id   = data.aws_caller_identity.current.account_id
  policies_dir = "${path.module}/../../policies"
  # The worker may create roles only within its boundary (environments/karrots-iam makes it).
  boundary = "arn:aws:iam::${local.account_id}:policy/karrots-worker-boundary"
}

data "aws_caller_identity" "current" {}

data "aws_region" "current" {}

# One customer-managed key for what the platform keeps: Kubernetes secrets, the state bucket
# and lock table, the trail and its bucket, and the log groups. Rotated every year; deleting it
# waits 30 days.
resource "aws_kms_key" "platform" {
  description             = "Karrots ${var.cluster_name}: secrets, state, trail and logs"
  enable_key_rotation     = true
  deletion_window_in_days = 30
  policy = templatefile("${local.policies_dir}/karrots-platform-key.json", {
    account_id = local.account_id
    region     = data.aws_region.current.name
  })
  tags = local.tags
}

resource "aws_kms_alias" "platform" {
  name          = "alias/${var.cluster_name}"
  target_key_id = aws_kms_key.platform.key_id
}

module "network" {
  source = "../network"

  name                 = var.cluster_name
  cidr_block           = var.vpc_cidr
  availability_zones   = var.availability_zones
  nat_gateway          = var.nat_gateway
  kms_key_arn          = aws_kms_key.platform.arn
  permissions_boundary = local.boundary
  tags                 = local.tags
}

module "eks" {
  source = "../eks"
  count  = var.eks == null ? 0 : 1

  name                 = var.cluster_name
  kubernetes_version   = var.eks.kubernetes_version
  subnet_ids           = module.network.private_subnet_ids
  node_instance_types  = var.eks.node_instance_types
  node_count           = var.eks.node_count
  public_access_cidrs  = var.eks.public_access_cidrs
  kms_key_arn          = aws_kms_key.platform.arn
  permissions_boundary = local.boundary
  tags                 = local.tags
}

module "ecr" {
  source = "../ecr"
  count  = var.ecr ? 1 : 0

  name = var.cluster_name
  tags = local.tags
}

module "dns" {
  source = "../dns"
  count  = var.dns == null ? 0 : 1
  providers = {
    aws          = aws
    aws.root_dns = aws.root_dns
  }

  name           = var.cluster_name
  parent_domain  = var.dns.parent_domain
  parent_zone_id = var.dns.parent_zone_id
  tags           = local.tags
}

module "data_peering" {
  source = "../data-peering"
  count  = var.data_peering == null ? 0 : 1
  providers = {
    aws      = aws
    aws.data = aws.data
  }

  name                   = var.cluster_name
  vpc_id                 = module.network.vpc_id
  vpc_cidr_block         = module.network.vpc_cidr_block
  route_table_ids        = [module.network.private_route_table_id]
  data_account_id        = var.data_peering.account_id
  data_vpc_id            = var.data_peering.vpc_id
  data_vpc_cidr_block    = var.data_peering.vpc_cidr_block
  data_route_table_ids   = var.data_peering.route_table_ids
  data_security_group_id = var.data_peering.security_group_id
  database_port          = var.data_peering.database_port
  peering_accepted       = var.data_peering.accepted
  tags                   = local.tags
}

# Where the state and trail buckets log who reads and writes them.
module "access_logs" {
  source = "../access-logs"
  count  = var.audit || var.state ? 1 : 0

  name = var.cluster_name
  tags = local.tags
}

module "audit" {
  source = "../audit"
  count  = var.audit ? 1 : 0

  name                 = var.cluster_name
  kms_key_arn          = aws_kms_key.platform.arn
  access_log_bucket    = module.access_logs[0].bucket
  permissions_boundary = local.boundary
  tags                 = local.tags
}

module "state" {
  source = "../state"
  count  = var.state ? 1 : 0

  name              = var.cluster_name
  kms_key_arn       = aws_kms_key.platform.arn
  access_log_bucket = module.access_logs[0].bucket
  tags              = local.tags
}
