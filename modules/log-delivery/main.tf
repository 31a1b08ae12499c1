locals {
  policies_dir = coalesce(var.policies_dir, "${path.module}/../../policies")
}

data "aws_caller_identity" "current" {}

# A log group one AWS service delivers into (VPC flow logs, CloudTrail): encrypted, kept
# var.retention_days, and a role that only that service, for this account, may assume, allowed
# to write into this group and nothing else.
resource "aws_cloudwatch_log_group" "this" {
  name              = var.log_group_name
  retention_in_days = var.retention_days
  kms_key_id        = var.kms_key_arn
  tags              = var.tags
}

resource "aws_iam_role" "delivery" {
  name = var.role_name
  assume_role_policy = templatefile("${local.policies_dir}/karrots-log-delivery-trust.json", {
    service    = var.service
    account_id = data.aws_caller_identity.current.account_id
  })
  permissions_boundary = var.permissions_boundary
  tags                 = var.tags
}

resource "aws_iam_role_policy" "delivery" {
  name = "deliver-into-its-log-group"
  role = aws_iam_role.delivery.id
  policy = templatefile("${local.policies_dir}/karrots-log-delivery.json", {
    log_group_arn = aws_cloudwatch_log_group.this.arn
  })
}
