locals {
  tags         = merge(var.tags, { "karrots:module" = "audit" })
  policies_dir = coalesce(var.policies_dir, "${path.module}/../../policies")
  bucket       = "${var.name}-cloudtrail-${data.aws_caller_identity.current.account_id}"
}

data "aws_caller_identity" "current" {}

resource "aws_s3_bucket" "trail" {
  # checkov:skip=CKV_AWS_144:The trail is multi-region already; a replica bucket in another region is a choice for an organisation-wide log archive account, not this platform.
  # checkov:skip=CKV2_AWS_62:Nothing consumes notifications of trail deliveries: drift attribution asks CloudTrail LookupEvents.
  bucket = local.bucket
  tags   = local.tags
}

resource "aws_s3_bucket_public_access_block" "trail" {
  bucket = aws_s3_bucket.trail.id

  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_versioning" "trail" {
  bucket = aws_s3_bucket.trail.id

  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "trail" {
  bucket = aws_s3_bucket.trail.id

  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm     = "aws:kms"
      kms_master_key_id = var.kms_key_arn
    }
    bucket_key_enabled = true
  }
}

# Trail logs are kept var.retention_days, then expire.
resource "aws_s3_bucket_lifecycle_configuration" "trail" {
  bucket = aws_s3_bucket.trail.id

  rule {
    id     = "expire-trail-logs"
    status = "Enabled"
    filter {}

    expiration {
      days = var.retention_days
    }

    noncurrent_version_expiration {
      noncurrent_days = 30
    }

    abort_incomplete_multipart_upload {
      days_after_initiation = 7
    }
  }

  depends_on = [aws_s3_bucket_versioning.trail]
}

resource "aws_s3_bucket_logging" "trail" {
  bucket        = aws_s3_bucket.trail.id
  target_bucket = var.access_log_bucket
  target_prefix = "${local.bucket}/"
}

resource "aws_s3_bucket_policy" "trail" {
  bucket = aws_s3_bucket.trail.id
  policy = templatefile("${local.policies_dir}/karrots-cloudtrail-bucket.json", {
    bucket     = local.bucket
    account_id = data.aws_caller_identity.current.account_id
  })
}

# The trail's events in CloudWatch Logs too, for metric filters and alarms.
module "trail_logs" {
  source = "../log-delivery"

  log_group_name       = "/karrots/${var.name}/cloudtrail"
  role_name            = "${var.name}-cloudtrail-logs"
  service              = "cloudtrail.amazonaws.com"
  kms_key_arn          = var.kms_key_arn
  retention_days       = var.retention_days
  permissions_boundary = var.permissions_boundary
  policies_dir         = var.policies_dir
  tags                 = local.tags
}

# Every API call in every region, so drift can be attributed to whoever made it.
resource "aws_cloudtrail" "main" {
  # checkov:skip=CKV_AWS_252:No reader of per-delivery SNS notifications: drift attribution asks LookupEvents, and alarms use the CloudWatch Logs copy.
  name                          = "${var.name}-trail"
  s3_bucket_name                = aws_s3_bucket.trail.id
  include_global_service_events = true
  is_multi_region_trail         = true
  enable_log_file_validation    = true
  kms_key_id                    = var.kms_key_arn
  cloud_watch_logs_group_arn    = "${module.trail_logs.log_group_arn}:*"
  cloud_watch_logs_role_arn     = module.trail_logs.role_arn
  tags                          = local.tags

  depends_on = [aws_s3_bucket_policy.trail]
}
