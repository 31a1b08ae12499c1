locals {
  tags = merge(var.tags, { "karrots:module" = "ecr" })
}

# Private; a pushed tag names one image for good, and every image is scanned on push.
resource "aws_ecr_repository" "main" {
  name                 = var.name
  image_tag_mutability = var.image_tag_mutability

  image_scanning_configuration {
    scan_on_push = true
  }

  # AWS's key for ECR (aws/ecr); a customer key adds nothing an image needs.
  encryption_configuration {
    encryption_type = "KMS"
  }

  tags = local.tags
}
