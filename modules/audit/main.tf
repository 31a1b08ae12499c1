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
resource "aws_cloudwatch_log_group" "trail" {
  name              = "/karrots/${var.name}/cloudtrail"
  retention_in_days = var.retention_days
  kms_key_id        = var.kms_key_arn
  tags              = local.tags
}

resource "aws_iam_role" "trail_logs" {
  name = "${var.name}-cloudtrail-logs"
  assume_role_policy = templatefile("${local.policies_dir}/karrots-log-delivery-trust.json", {
    service    = "cloudtrail.amazonaws.com"
    account_id = data.aws_caller_identity.current.account_id
  })
  permissions_boundary = var.permissions_boundary
  tags                 = local.tags
}

resource "aws_iam_role_policy" "trail_logs" {
  name = "deliver-into-its-log-group"
  role = aws_iam_role.trail_logs.id
  policy = templatefile("${local.policies_dir}/karrots-log-delivery.json", {
    log_group_arn = aws_cloudwatch_log_group.trail.arn
  })
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
  cloud_watch_logs_group_arn    = "${aws_cloudwatch_log_group.trail.arn}:*"
  cloud_watch_logs_role_arn     = aws_iam_role.trail_logs.arn
  tags                          = local.tags

  depends_on = [aws_s3_bucket_policy.trail, aws_iam_role_policy.trail_logs]
}
