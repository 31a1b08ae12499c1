locals {
  tags         = merge(var.tags, { "karrots:module" = "audit" })
  policies_dir = coalesce(var.policies_dir, "${path.module}/../../policies")
  bucket       = "${var.name}-cloudtrail-${data.aws_caller_identity.current.account_id}"
}

data "aws_caller_identity" "current" {}

resource "aws_s3_bucket" "trail" {
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

resource "aws_s3_bucket_policy" "trail" {
  bucket = aws_s3_bucket.trail.id
  policy = templatefile("${local.policies_dir}/karrots-cloudtrail-bucket.json", {
    bucket     = local.bucket
    account_id = data.aws_caller_identity.current.account_id
  })
}

# Every API call in every region, so drift can be attributed to whoever made it.
resource "aws_cloudtrail" "main" {
  name                          = "${var.name}-trail"
  s3_bucket_name                = aws_s3_bucket.trail.id
  include_global_service_events = true
  is_multi_region_trail         = true
  enable_log_file_validation    = true
  tags                          = local.tags

  depends_on = [aws_s3_bucket_policy.trail]
}
